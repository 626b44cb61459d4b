"""Operations: what keeps the gateway running unattended (retention, for now)."""
