"""Behaviour sweeps: a grid of lambdas -> recipes -> child checkpoints -> evaluations -> one table.

    chimera sweep recipe.yaml --vary routed_experts.r1=0:1:0.1 [--vary default.r1=0,0.5] --suite all -o sweep/

- `grid.py`     the `--vary` axes and the feasible child recipes (the rules are in its docstring)
- `runner.py`   one point: merge the child, evaluate it (in process or on a server), write its record
- `servers.py`  one OpenAI-compatible server per model, from `--endpoint-cmd`
- `table.py`    the records as one table (`table.csv`, `table.json`)
- `run.py`      `run_sweep`: resume, run the missing points (local worker processes or Ray tasks)

Each grid point is a child written by the merge engine into `OUT/children/<id>` (removed after its
evaluation unless `keep_children`), evaluated by the harness in memory, or on an OpenAI-compatible
server started per child from `endpoint_cmd` (a template with `{model}` and `{port}`). Every parent
is evaluated as well (the table's reference rows). One JSON file per point in `OUT/points/` makes an
interrupted sweep resumable: a point whose file holds the same settings is not recomputed. The table
is written to `OUT/table.csv` and `OUT/table.json`; `chimera report OUT` draws it.
"""
from chimera.sweep.grid import Axis, Point, build_grid, child_weights, parent_points, parse_values, parse_vary, point_id
from chimera.sweep.run import SweepResult, run_sweep
from chimera.sweep.runner import CHILDREN_DIR, MANIFEST, POINTS_DIR, Settings, fingerprint, run_point
from chimera.sweep.servers import EndpointSpec
from chimera.sweep.table import HEADLINE, load_table, row, weights_text, write_table

__all__ = ["run_sweep", "SweepResult", "EndpointSpec", "Settings", "Axis", "Point", "build_grid", "child_weights",
           "parent_points", "parse_values", "parse_vary", "point_id", "run_point", "fingerprint", "row",
           "write_table", "load_table", "weights_text", "HEADLINE", "POINTS_DIR", "CHILDREN_DIR", "MANIFEST"]
