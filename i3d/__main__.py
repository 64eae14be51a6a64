"""``python -m i3d`` runs the command line (as torchrun does for multi-node training)."""

from i3d.cli.main import main

main()
