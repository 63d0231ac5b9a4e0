-- The PowerSync to-do demo schema, created by the zero-configuration run.
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
  list_id uuid not null references public.lists(id) on delete cascade
);
