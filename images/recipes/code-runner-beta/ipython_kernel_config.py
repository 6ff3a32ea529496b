# IPython kernels of the code-runner-beta template.
c = get_config()  # noqa: F821
c.InteractiveShellApp.extensions = ["wrenn_capsule_env"]
