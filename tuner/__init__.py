"""The autotuner: Optuna studies over ``kernels.config.SPACE`` that write ``profiles/<device>.json``.

    suite / --shapes ─► space (suggest, reject infeasible) ─► worker subprocesses (gate, compile, time)
        ─► study (Optuna storage, resumable) ─► interleaved re-time of the best few ─► profiles.table.save_profile
"""
