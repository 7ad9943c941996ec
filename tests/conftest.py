import os
import sys

# Make the repository root importable so tests can share support modules (tests.oracles.*).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
