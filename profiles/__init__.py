"""Shipped config tables (one JSON file per GPU) and the runtime dispatcher that reads them."""
