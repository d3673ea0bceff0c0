"""Optional integrations of fastpool with other libraries (each imports its library only when imported)."""
