"""Reports: HTML building blocks (html) and the evaluation report (evaluation)."""
