"""Store tests: one shared contract (``contract.py``) and one module per backend."""
