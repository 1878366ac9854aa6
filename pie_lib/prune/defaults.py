"""The default K ladder and method list of ``pie prune`` (no imports: the CLI's --help reads them)."""

DEFAULT_LADDER = (50, 75, 100, 200, 400, 800)
DEFAULT_METHODS = ("fap", "fap-synergy", "clt-relp", "act-mag", "random")
