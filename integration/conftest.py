def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: builds environments from scratch; deselect with -m 'not slow'",
    )
