"""The RobustSSL-style benchmark: published numbers to compare with (``reported``) and the
leaderboard writer (``leaderboard``). Nothing here runs a model."""
