"""smp: social-media popularity prediction, tracked with MLflow.

Data flows one way: ``data`` (SMPD files / posts table -> posts DataFrame) ->
``splits`` -> ``features`` (tabular) / ``image_features`` + ``embed`` (images)
-> ``models`` -> ``train`` (entry-point jobs) -> ``evaluate`` / ``plots`` ->
``registry`` -> ``serving`` / ``predict``.  Nothing happens at import time.
"""

__version__ = "0.1.0"
