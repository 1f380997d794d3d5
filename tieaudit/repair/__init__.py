"""Repairs, on top of the audit: `fix` (fix_plan: what to change, pure; fix_layout: which files; fix: the
orchestration) and `merge` (merge_plan, merge), both written through staging (a complete staged copy, one atomic
switch), tensor_files and lock. `tieaudit.fix` and `tieaudit.merge` are the public entry points."""
