"""conversation_service: owns conversations and their messages; serves todo.v1.ConversationService."""
