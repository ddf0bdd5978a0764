"""smp: social-media popularity prediction, tracked with MLflow.

Data flows one way: ``data`` (SMPD files / posts table -> posts DataFrame) ->
``splits`` -> ``features`` (tabular) / ``image_features``, ``clip``, ``embed``,
``image_requests`` (images) -> ``models``, ``nets`` -> ``serving`` (the logged
pyfunc), ``evaluate``, ``plots`` -> ``train`` (the model jobs) -> ``report``,
``tune``, ``registry`` -> ``predict`` -> ``cli``; ``jobs``, ``config`` and
``tracking`` serve every stage (tests/test_architecture.py checks the
direction).  Nothing happens at import time.
"""

__version__ = "0.1.0"
