"""smp: social-media popularity prediction, tracked with MLflow.

Data flows one way: ``data`` (SMPD files / posts table -> posts DataFrame) ->
``splits`` -> ``features`` (tabular) / ``image_features``, ``clip``, ``feature_cache``,
``embed``, ``image_requests`` (images) -> ``boosters``, ``models``, ``nets``, ``spaces``
-> ``serving`` (the logged pyfunc), ``evaluate``, ``plots`` -> ``packaging``, ``fit``
-> ``upstream``, ``record`` -> ``train`` (the model jobs and their families) ->
``families`` -> ``report``, ``tune``, ``registry`` -> ``predict`` -> ``catalog`` ->
``cli``; ``jobs`` (the Job/Family types), ``config`` and ``tracking`` serve every
stage (tests/test_architecture.py checks the direction).  A model job reads
resolve (``upstream``) -> fit (``fit``, no MLflow) -> record (``record``).
Nothing happens at import time.
"""

__version__ = "0.1.0"
