"""Checks behind `longcat-convert validate`; `longcat_convert.validation.run.validate_tree` runs them in order."""
