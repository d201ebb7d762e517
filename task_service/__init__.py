"""task_service: owns the tasks table; serves todo.v1.TaskService over gRPC."""
