"""The default K ladder, method list and pair count of ``pie prune`` (no imports: the CLI's --help reads them)."""

DEFAULT_LADDER = (50, 75, 100, 200, 400, 800)
DEFAULT_METHODS = ("fap", "fap-synergy", "clt-relp", "act-mag", "random")

#: Number of generated pairs when ``--n`` is not given (``--task``); a data file is used whole.
DEFAULT_TASK_PAIRS = 32
