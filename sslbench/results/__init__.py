"""Results out: metric rows and ``metrics.csv``, per-sample records (``predictions.npz``), the leaderboard built from
every run's rows — entries over seeds with intervals, tests against a base and a baseline, budgets — as Markdown,
CSV, figures and one HTML page, and the words at the end of a run. Imports ``core`` and ``evaluation``.
"""
