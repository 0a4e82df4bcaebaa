"""dpo_lab: the code behind the dpo-lab workbook.

Notebooks narrate and plot; the logic they call lives here, in small modules named
after the concept they teach.
"""
from dpo_lab.runtime import setup, set_seed, pick
from dpo_lab.figures import write_figures, read_figures
from dpo_lab import exercises

__all__ = ["setup", "set_seed", "pick", "write_figures", "read_figures"]
__version__ = "0.1.0"
