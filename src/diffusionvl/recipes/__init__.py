"""End-to-end recipes (data -> compose -> train -> translate -> evaluate -> export), one module each."""
