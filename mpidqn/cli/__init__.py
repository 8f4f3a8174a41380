"""Command line: argument parsing and the train, evaluate, report and inspect commands."""
