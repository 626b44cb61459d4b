"""Routing: facts from headers, declarative rules, the decision and its explanation
(a pure function of headers and settings)."""
