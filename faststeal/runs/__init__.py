"""Every experiment runs on one runner (:mod:`faststeal.runs.runner`); each study is one file.

* :mod:`~faststeal.runs.comparison` — the paper's comparison (``faststeal run``):
  :class:`Config`, :func:`run_comparison`;
* :mod:`~faststeal.runs.active` — active stealing: query strategies against random
  (``faststeal study active``);
* :mod:`~faststeal.runs.diversity` — diversity-keeping ensembles against the Deep Ensemble
  (``faststeal study diversity``);
* :mod:`~faststeal.runs.defense` — defended victims (``faststeal study defense``).

A new study is a :class:`~faststeal.runs.runner.Study` subclass in its own file, registered with
``@register`` and imported here.
"""

from .runner import STUDIES, Cell, Run, Setup, Study, register, run_study, write_report
from .comparison import (OUTPUT_MODES, PRESETS, ComparisonStudy, Config, parse_methods,
                         run_comparison)
from .active import ActiveSettings, ActiveStudy
from .diversity import DiversitySettings, DiversityStudy
from .defense import DefenseSettings, DefenseStudy

__all__ = ["STUDIES", "Cell", "Run", "Setup", "Study", "register", "run_study", "write_report",
           "Config", "run_comparison", "parse_methods", "PRESETS", "OUTPUT_MODES",
           "ComparisonStudy", "ActiveSettings", "ActiveStudy", "DiversitySettings",
           "DiversityStudy", "DefenseSettings", "DefenseStudy"]
