"""What happened: the decision line logged for every request and connection, and the writer that
keeps the same decisions in the SQLite audit database.
"""
