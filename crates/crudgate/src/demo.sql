-- The PowerSync to-do demo schema, created by the zero-configuration run. One difference: a
-- todo's list_id may be NULL, so a todo can be tried on its own (a list_id that names no list
-- is still a FOREIGN_KEY_VIOLATION).
create table if not exists public.lists (
  id uuid primary key default gen_random_uuid(),
  created_at timestamptz not null default now(),
  name text not null,
  owner_id text
);
create table if not exists public.todos (
  id uuid primary key default gen_random_uuid(),
  created_at timestamptz not null default now(),
  completed_at timestamptz,
  description text not null,
  completed boolean not null default false,
  created_by text,
  completed_by text,
  list_id uuid references public.lists(id) on delete cascade
);
