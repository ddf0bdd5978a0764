"""Stage 12: every entry point, in the order ``smp --help`` and MLproject list them: the ``Job`` each stage's
module defines beside its run function, and the model families from ``smp.families``. Read by ``smp.cli``
(subcommands, ``cli_spec.json``, MLproject), imported only when a job is used.
"""

from __future__ import annotations

from smp.ablation import ABLATION
from smp.engines import EMBED
from smp.families import FAMILIES
from smp.jobs import Job, table
from smp.predict import PREDICT
from smp.registry import PROMOTE
from smp.report import COMPARE
from smp.synth import SYNTH
from smp.tune import TUNE

JOBS: dict[str, Job] = table(SYNTH, EMBED, *FAMILIES.values(), COMPARE, ABLATION, TUNE, PROMOTE, PREDICT)
