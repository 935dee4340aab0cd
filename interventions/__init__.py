"""Declarative interventions (steering, ablation, patching) applied through nnsight.

Not built yet: issue 4 fills this package. Requests that name interventions
are not accepted by the server until then.
"""
