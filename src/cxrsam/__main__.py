"""``python -m cxrsam`` (also what ``accelerate launch -m cxrsam`` runs)."""

from cxrsam.cli import main

main()
