"""Helpers that let no-gradient passes (rollouts, teacher scoring) run on any TP/PP/SP layout."""
