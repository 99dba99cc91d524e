"""The paper's measurable claims, run by the science commands (docs/science.md): fits.py (the laws, with
uncertainties), recurrence_curve.py (loss against recurrences at test time), grid.py + sweep.py +
scaling.py (recurrence x FLOP sweeps and their power laws), stability.py (injection x
learning rate), compare.py (Parcae against its GPT), report.py (all of it, one report),
plots.py (the figures)."""
