"""`glmserve serve`: the router's HTTP front over an engine in the same process (no disaggregation).

Lives outside glmserve.router because it needs torch and the router must not (see the import contracts
in pyproject.toml).
"""
