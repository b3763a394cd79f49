"""The ChouetteCopro side: the HTTP client and the content it uploads."""
