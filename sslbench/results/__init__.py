"""Results out: metric rows and ``metrics.csv``, the leaderboard built from every run's rows, and the plots.
Imports ``core`` and ``evaluation``.
"""
