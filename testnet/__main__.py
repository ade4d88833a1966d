"""Lets `python -m testnet ...` run the testnet command line."""

from testnet.cli import main

main()
