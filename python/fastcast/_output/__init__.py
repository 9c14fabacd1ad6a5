"""The output folder as a transaction: the staging folder, the lock, commit and undo
(``transaction``), the record of what a run wrote (``record``), ``--report`` files
(``report_file``).
"""
