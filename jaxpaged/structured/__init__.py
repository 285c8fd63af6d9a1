"""Structured outputs: grammars (JSON schema, regex, choice, Lark/GBNF) enforced on the device by
a token bitmask that the host fills with llguidance (see ``manager``)."""
