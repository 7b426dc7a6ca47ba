"""The counters as users read them: metric families, the fast exposition, the tables."""
