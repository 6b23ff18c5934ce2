"""Runners behind the command line: cross-backend checks and reports."""
