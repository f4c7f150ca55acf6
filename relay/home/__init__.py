"""Home: the intake that pulls sealed mail from the edge and delivers it to Dovecot."""
