# Jupyter server of the code-runner-beta template. It is reached only through the
# capsule's port proxy (8888-<capsule>.<domain>), as every port of a capsule is, so it
# asks for no token of its own.
c = get_config()  # noqa: F821
c.ServerApp.ip = "0.0.0.0"
c.ServerApp.port = 8888
c.ServerApp.port_retries = 0
c.ServerApp.open_browser = False
c.ServerApp.root_dir = "/home/user"
c.ServerApp.allow_origin = "*"
c.ServerApp.allow_remote_access = True
c.ServerApp.disable_check_xsrf = True
c.ServerApp.password = ""
c.IdentityProvider.token = ""
c.MappingKernelManager.default_kernel_name = "wrenn"
