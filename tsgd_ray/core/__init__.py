"""The TSGD algorithm in plain PyTorch: no Ray, no MLflow, no storage.

Every function here works on tensors in one process (a notebook, a test, a Ray actor).
"""
