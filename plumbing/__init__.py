"""What ddpo.py, d3po.py and prdp.py stand on, and a reader of the algorithms may skip: flags, prompt files, metrics,
grids and checkpoints (bookkeeping), the rewards (rewards), torchrun (distributed), D3PO's rounds of human feedback
(human_feedback) and their labelling page (label, label_page/), and the comparison of a run with its base model
(evaluate). The algorithms' own code is in the scripts and common.py. Two commands live here, run from the
repository's folder: `python -m plumbing.label ROUND` and `python -m plumbing.evaluate RUN`.

Importing it first (the scripts do) makes Ctrl-C while torch and diffusers are still loading end in one line
instead of a traceback; once a run has started, bookkeeping.run_main says how to go on.
"""
import sys


def _interrupted_in_one_line(kind, value, traceback, default=sys.excepthook):
    if issubclass(kind, KeyboardInterrupt):
        print("\ninterrupted", file=sys.stderr)  # before run_main took over (it says how to resume a run)
    else:
        default(kind, value, traceback)


sys.excepthook = _interrupted_in_one_line
