"""Experiments that test the method's published claims on our toy tasks (see RESULTS.md).

    python -m experiments NAME [--out DIR] [--size tiny|full] [--publish]
"""
