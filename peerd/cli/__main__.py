"""`python -m peerd.cli ...`, as the tests and the testnet run it."""

from peerd.cli import main

main()
