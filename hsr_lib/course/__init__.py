"""The course (docs/course.md): the checks that grade the exercises in ``course/exercises/``, the
toy helpers they use, and the student version written from the instructor notebooks.

Each ``check_*`` takes the student's function, compares it with the library on random and toy
inputs, prints one line when it passes and raises :class:`CheckFailed` saying what is wrong, in a
student's terms, when it does not.
"""

from .feedback import CheckFailed
from .heads import check_head_kl, check_kv_head
from .metrics import check_asr, check_restored_ratio, check_rsr
from .sets import check_head_region, check_set_operation, check_top_fraction
from .sweep import check_sweep
from .wanda import check_masks, check_wanda_importance

__all__ = ["CheckFailed", "check_asr", "check_head_kl", "check_head_region", "check_kv_head", "check_masks",
           "check_restored_ratio", "check_rsr", "check_set_operation", "check_sweep", "check_top_fraction",
           "check_wanda_importance"]
