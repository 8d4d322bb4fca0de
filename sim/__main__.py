"""``python -m spendtap.sim --listen HOST:PORT``: the same command as ``spendtap simulate``."""

from spendtap.cli.simulate import simulate

simulate(prog_name="python -m spendtap.sim")
