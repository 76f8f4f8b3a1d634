"""A rank that never finishes: tests/test_launch_helpers.py checks that a hung launch is ended with its stacks."""

import time


def wait_forever() -> None:
    while True:
        time.sleep(1)


wait_forever()
