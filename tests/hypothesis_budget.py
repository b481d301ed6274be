"""How many examples a property test tries.

Under mutation testing (scripts/mutants.py) every mutant reruns the tests that
reach it, so the driver caps the examples with REMUS_MUTATION_EXAMPLES; a
normal run tries the number the test asks for.
"""
import os


def examples(wanted: int) -> int:
    cap = os.environ.get("REMUS_MUTATION_EXAMPLES")
    return min(wanted, int(cap)) if cap else wanted
