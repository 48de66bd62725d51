"""Roofline reports in the terminal, rendered from stored profiles (no kernel launches here)."""
