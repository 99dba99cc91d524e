"""The paper's measurable claims as commands: fits (fits.py), test-time scaling
(test_time.py), sweeps over recurrence and FLOP budgets (sweep.py), plots (plots.py)."""
