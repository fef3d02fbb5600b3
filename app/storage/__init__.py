"""Where instances live: blob stores and the searchable index, behind narrow Protocols."""
