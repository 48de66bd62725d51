"""The autotuner: Optuna studies over a registered op's space (``kernels.spec.KernelSpec``) that write
``profiles/<device>.json``.

    suite / --shapes ─► space (suggest, reject infeasible) ─► worker subprocesses (gate, compile, time)
        ─► study (Optuna storage, resumable) ─► interleaved re-time of the best few ─► profiles.table.save_profile
"""
